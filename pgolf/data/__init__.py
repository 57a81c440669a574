"""Data: challenge-format token shards, the streaming loader, and where the data comes from.

`DataSpec.ensure()` finds (or builds) the shards and tokenizer; `DistributedTokenLoader` and
`load_validation_tokens` read them with the challenge baseline's exact semantics.
`pgolf.data.download.download` fetches the published FineWeb export and
`pgolf.data.prepare.prepare` builds shards from local documents; those two are not
re-exported here because a package attribute named like a submodule would hide the module
(breaking `import pgolf.data.download` and monkeypatching `pgolf.data.download.hf_hub_download`),
and leaving them out also keeps huggingface_hub out of `import pgolf.data`.
"""

from pgolf.data.loader import DistributedTokenLoader, TokenStream, load_validation_tokens
from pgolf.data.prepare import stdlib_files
from pgolf.data.shards import read_shard, write_shard
from pgolf.data.spec import DataSpec, ResolvedData

__all__ = [
    "DataSpec",
    "DistributedTokenLoader",
    "ResolvedData",
    "TokenStream",
    "load_validation_tokens",
    "read_shard",
    "stdlib_files",
    "write_shard",
]
