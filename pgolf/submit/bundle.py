"""One standalone `train_gpt.py` from a run: what a record submission must contain.

The challenge counts the bytes of one script, so a package cannot be submitted as it is.
The bundler reads the run's modules in dependency order, drops the imports between them
(one namespace), keeps only the top-level definitions that the entry point and the run's
`_target_`s reach, leaves out the parts its config does not switch on (pgolf.submit.reach),
strips docstrings, and writes the run's resolved config as the script's defaults (each
overridable by an environment variable, see pgolf.submit.entry). The result imports only the
standard library, torch, numpy, sentencepiece and zstandard.

Two forms of one code: `render` is the readable source; `counted_script` is what a submission
ships and counts, as the records count code from #1530 on (2026-04-10; `_compressed_code_size`
of #2135): minified with python-minifier (no renames), lzma-compressed, base85-wrapped in a
two-line script that `exec`s it.
"""

from __future__ import annotations

import ast
import base64
import builtins
import functools
import hashlib
import importlib.metadata
import lzma
import os
import pprint
from pathlib import Path

import yaml

from pgolf.data.spec import cache_root
from pgolf.errors import PgolfError
from pgolf.submit.reach import left_out, rows

PACKAGE_DIR = Path(__file__).resolve().parent.parent
# Dependency order: a module comes after every module whose names it uses at import time.
MODULES = (
    "errors", "quant/treatments", "quant/lqer", "quant/rules", "quant/gptq", "quant/state", "quant/codecs",
    "quant/pergroup", "quant/prune", "quant/artifact", "quant/calibrate", "quant/spec", "model/roles", "model/linear",
    "model/rotary", "model/docs", "model/value_residual", "model/attention", "model/mlp", "model/block",
    "model/recurrence", "model/residual", "model/embeddings", "model/head", "model/config", "model/gpt", "optim",
    "progressive", "schedule",
    "evaluate", "ttt/scorer", "ttt/common", "ttt/adapters", "ttt/run", "ttt/chunked", "ttt/lora", "ttt/phased", "ttt/ngram",
    "data/shards", "data/loader", "data/loaders", "data/packing", "data/caseops", "data/byte_counts", "data/spec",
    "config_checks", "compile_limits", "idle_params", "runlog", "checkpoint", "trainer", "submit/entry",
)
ENTRY = "submit/entry"
# Groups a bundled script does not use: it logs to its run dir only, and torchrun starts the workers.
DROPPED_GROUPS = ("logger", "distributed")
ALLOWED_IMPORTS = {"torch", "numpy", "sentencepiece", "zstandard", "__future__"}


def _module_name(rel: str) -> str:
    return "pgolf." + rel.replace("/", ".")


class _StripPackage(ast.NodeTransformer):
    """Inside functions: drop imports of bundled pgolf modules (their names are global in the
    bundle); an import of a module left out becomes a raise, reached only by an unused path."""

    def __init__(self, defined: set[str], unbundled: set[str]):
        self.defined, self.unbundled = defined, unbundled

    def visit_ImportFrom(self, node: ast.ImportFrom):
        if not (node.module or "").startswith("pgolf"):
            return node
        if all(a.name in self.defined and a.asname is None for a in node.names):
            return None
        self.unbundled |= {a.asname or a.name for a in node.names}
        msg = f"{node.module} is not part of this bundled script"
        return ast.parse(f"raise PgolfError({msg!r})").body[0]

    def _strip_docstring(self, node):
        self.generic_visit(node)
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            body = body[1:]
        node.body = body or [ast.Pass()]
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _strip_docstring


def _defines(stmt: ast.stmt) -> set[str]:
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {stmt.name}
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in stmt.names}
    if isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return set()


def _uses(stmt: ast.stmt) -> set[str]:
    return {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name)}


@functools.lru_cache(maxsize=1)
def _sources() -> tuple[str, ...]:
    """The bundled modules' texts, in MODULES order (read once a process)."""
    return tuple((PACKAGE_DIR / f"{rel}.py").read_text(encoding="utf-8") for rel in MODULES)


@functools.lru_cache(maxsize=1)
def _statements() -> tuple[list[tuple[str, ast.stmt]], set[str]]:
    """Every top-level statement of the bundled modules, with pgolf imports removed, and the
    names whose import from a left-out module became a raise."""
    parsed = {rel: ast.parse(text) for rel, text in zip(MODULES, _sources())}
    defined = {name for tree in parsed.values() for stmt in tree.body for name in _defines(stmt)
               if not isinstance(stmt, (ast.Import, ast.ImportFrom))}
    out, owner, unbundled = [], {}, set()
    for rel, tree in parsed.items():
        body = tree.body[1:] if ast.get_docstring(tree) is not None else tree.body
        for stmt in body:
            if isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__":
                continue
            if isinstance(stmt, ast.ImportFrom) and (stmt.module or "").startswith("pgolf"):
                missing = [a.name for a in stmt.names if a.name not in defined]
                assert not missing, f"{rel}: {missing} from {stmt.module} are not in the bundled modules"
                continue
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                root = (stmt.module if isinstance(stmt, ast.ImportFrom) else stmt.names[0].name).split(".")[0]
                assert root in ALLOWED_IMPORTS or root in _stdlib(), f"{rel} imports {root}"
            else:
                for name in _defines(stmt):  # one namespace: a name may be defined once
                    assert owner.setdefault(name, rel) == rel or rel == ENTRY, f"{name} in {owner[name]} and {rel}"
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):  # one statement per name: unused names go
                for alias in stmt.names:
                    one = ast.ImportFrom(stmt.module, [alias], 0) if isinstance(stmt, ast.ImportFrom) else ast.Import([alias])
                    out.append((rel, ast.fix_missing_locations(one)))
                continue
            out.append((rel, ast.fix_missing_locations(_StripPackage(defined, unbundled).visit(stmt))))
    return out, unbundled


def _stdlib() -> set[str]:
    import sys

    return set(sys.stdlib_module_names)


def _prune(statements: list[tuple[str, ast.stmt]], roots: set[str], left_out: set[str] = frozenset()) -> list[ast.stmt]:
    """Keep the statements that define a name reachable from `roots` (and those defining nothing);
    names in `left_out` (parts the run's config does not use, pgolf.submit.reach) are not followed."""
    by_name: dict[str, list[int]] = {}
    for i, (_, stmt) in enumerate(statements):
        for name in _defines(stmt) - left_out:
            by_name.setdefault(name, []).append(i)
    keep = {i for i, (rel, stmt) in enumerate(statements) if rel == ENTRY or not _defines(stmt)}
    todo = set().union(*(_uses(statements[i][1]) for i in keep)) | roots
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for i in by_name.get(name, []):
            if i not in keep:
                keep.add(i)
                todo |= _uses(statements[i][1])
    kept, plain, named = [], {}, {}
    for i, (_, stmt) in enumerate(statements):
        if i not in keep:
            continue
        if isinstance(stmt, ast.ImportFrom):  # the same import in several modules: once, merged per module
            named.setdefault(stmt.module, {})[ast.unparse(stmt)] = stmt.names[0]
        elif isinstance(stmt, ast.Import):
            plain[ast.unparse(stmt)] = stmt
        else:
            kept.append(stmt)
    imports = [plain[k] for k in sorted(plain)] + [
        ast.ImportFrom(module, [named[module][k] for k in sorted(named[module])], 0) for module in sorted(named)]
    return imports + kept


def bundle_config(config: dict) -> dict:
    """The defaults a bundled script carries: the run's config, data as pre-built shards (with the
    run's loader, BOS id and CaseOps sidecar, which change what is trained and scored)."""
    from pgolf.data import DataSpec

    out = {k: v for k, v in config.items() if k not in DROPPED_GROUPS}
    out.update(run_id=None, resume=None)
    spec = DataSpec(**{k: v for k, v in config["data"].items() if not k.startswith("_")})
    data_path, tokenizer_path = spec.data_path, spec.tokenizer_path
    if spec.source is not None:  # a built source: point at where it was built
        data_path, tokenizer_path = str(spec.build_dir()), str(spec.build_dir() / "tokenizer.model")
    out["data"] = {"_target_": config["data"]["_target_"], "name": spec.name, "data_path": data_path,
                   "tokenizer_path": tokenizer_path, "train_files": spec.train_files, "val_files": spec.val_files,
                   "loader": spec.loader, "bos_id": spec.bos_id, "caseops": spec.caseops}
    out.setdefault("checkpoint", {"_target_": "pgolf.checkpoint.Checkpointing"})
    return out


CONFIG_TOKEN = "_PGOLF_CONFIG_"  # stands for the config literal until the code is written out
ABSENT = ("class _Absent:\n    def __init__(self, *args, **kwargs):\n        raise PgolfError('this part was left "
          "out of the bundled script: its run did not use it; bundle a run that does')\n")


def _plan(config: dict) -> tuple[dict[str, str], set[str], dict]:
    """What shapes a run's bundled code: its parts' `_target_`s (to class names), the parts left
    out, and the options frozen in the script (`left_out`)."""
    config = bundle_config(config)

    def nested(node):  # a group's `_target_` and those of its sub-nodes (eval.ttt)
        if isinstance(node, dict):
            yield from ([node["_target_"]] if "_target_" in node else [])
            for value in node.values():
                yield from nested(value)

    targets = sorted({t for node in config.values() for t in nested(node)})
    dropped, fixed = left_out(config)
    return {t: t.rsplit(".", 1)[1] for t in targets}, dropped, fixed


def _chunks(config: dict) -> list[str]:
    """The bundled code of a run, one top-level statement per chunk, with CONFIG_TOKEN where the
    config literal goes."""
    names, dropped, fixed = _plan(config)
    everything, unbundled = _statements()
    # The parts the config reaches are roots too: a registered part (an attention gate) is found
    # through its registry, never by name.
    reached = {name for row in rows() for name in row.names} - dropped
    statements = _prune(everything, set(names.values()) | reached, dropped)
    # A part left out but named by shipped code (a table, a guarded call) is bound to _Absent.
    named = sorted(dropped & set().union(*(_uses(stmt) for stmt in statements)))
    undefined = _undefined_globals(statements) - unbundled - set(named)
    assert not undefined, f"bundle refers to undefined names {sorted(undefined)}"
    # The entry's placeholders get the run's values.
    from pgolf.model.config import gate_flags

    values = {"CONFIG": CONFIG_TOKEN, "FIXED": repr(fixed), "FLAGS": repr(gate_flags()),
              "TARGETS": "{" + ", ".join(f"{t!r}: {n}" for t, n in names.items()) + "}"}

    def text(stmt: ast.stmt) -> str:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id in values:
            return f"{stmt.target.id} = {values[stmt.target.id]}"
        return ast.unparse(stmt) + ("\n" if isinstance(stmt, (ast.FunctionDef, ast.ClassDef)) else "")

    n_imports = sum(isinstance(stmt, (ast.Import, ast.ImportFrom)) for stmt in statements)
    chunks = [text(stmt) for stmt in statements]
    if named:
        chunks[n_imports:n_imports] = [ABSENT + " = ".join(named) + " = _Absent\n"]
    return ["from __future__ import annotations", *chunks, '\nif __name__ == "__main__":\n    cli()\n']


def render(config: dict) -> str:
    """The readable source of a standalone train_gpt.py for a resolved run config (a plain dict):
    the run's parts only, the config one key per line. What counts is `counted_script`'s text."""
    dropped = sorted(left_out(bundle_config(config))[0])
    doc = (f"Parameter Golf training script bundled by pgolf from run {config.get('run_id')}.\n"
           "Run: torchrun --standalone --nproc_per_node=8 train_gpt.py   (env vars override the defaults, "
           "e.g. SEED=42 DATA_PATH=... MAX_WALLCLOCK_SECONDS=600)"
           + ("\nLeft out (the run's config does not use them): " + ", ".join(dropped) if dropped else ""))
    source = "\n".join(_chunks(config))
    assert source.count(CONFIG_TOKEN) == 1
    config_text = pprint.pformat(bundle_config(config), width=110, sort_dicts=False)
    return f'"""{doc}"""\n' + source.replace(CONFIG_TOKEN, config_text)


MINIFY_OPTIONS = dict(rename_locals=False, rename_globals=False, hoist_literals=False, remove_literal_statements=True)


def _disk_cached(kind: str, key: tuple, make) -> str:
    """`make()`'s text, kept under `$PGOLF_CACHE/<kind>/` by a hash of `key` plus python-minifier's
    version. A cache only: an unwritable folder costs time, never the result."""
    digest = hashlib.sha256(repr((importlib.metadata.version("python-minifier"), key)).encode()).hexdigest()
    path = cache_root() / kind / f"{digest}.py"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    text = make()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass
    return text


@functools.lru_cache(maxsize=None)
def minify(source: str) -> str:
    """`source` minified as the records count code (#1530 on; #2135's `_compressed_code_size`):
    python-minifier with no renames and no literal hoisting, docstrings removed. A bundle is
    minified one top-level statement at a time, so the statements that runs share are done once
    (also across processes, on disk)."""
    import python_minifier

    return _disk_cached("minified", (sorted(MINIFY_OPTIONS.items()), source),
                        lambda: python_minifier.minify(source, **MINIFY_OPTIONS))


def wrap(source: str) -> str:
    """A two-line script that decompresses and runs `source` (lzma, then base85: no quotes or
    backslashes), the records' self-extracting form; its length is what counts toward the cap."""
    blob = base64.b85encode(lzma.compress(source.encode("utf-8"))).decode("ascii")
    return f'import lzma as L,base64 as B\nexec(L.decompress(B.b85decode("{blob}")))\n'


def minified_source(config: dict) -> str:
    """The run's code minified, the config spliced in as one literal: what `counted_script` wraps.
    Runs that bundle the same parts share the minified code, which is kept on disk by the bundled
    modules' sources and the parts (parsing, pruning and minifying cost about 2 CPU s a run)."""
    names, dropped, fixed = _plan(config)
    registered = sorted(name for row in rows() for name in row.names)  # a part registered at run time
    code = _disk_cached("bundled", (_sources(), sorted(names.items()), sorted(dropped), repr(fixed), registered),
                        lambda: "\n".join(minify(chunk) for chunk in _chunks(config)))
    assert code.count(CONFIG_TOKEN) == 1, "python-minifier changed the config placeholder"
    return code.replace(CONFIG_TOKEN, repr(bundle_config(config)))


def counted_script(config: dict) -> str:
    """The train_gpt.py a submission ships and counts: the run's code minified, lzma-compressed and
    base85-wrapped in two lines."""
    return wrap(minified_source(config))


def code_bytes(config: dict) -> int:
    """A run's counted code bytes (what `artifact/code_bytes` and submission.json report)."""
    return len(counted_script(config).encode("utf-8"))


def _undefined_globals(statements: list[ast.stmt]) -> set[str]:
    """Names read anywhere that no statement, builtin, parameter or local binding defines (a
    coarse check that the pruning kept everything; locals are any name stored anywhere)."""
    module = ast.Module(body=statements, type_ignores=[])
    bound = set(dir(builtins)) | {"__file__", "__name__"}
    for node in ast.walk(module):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return {n.id for n in ast.walk(module) if isinstance(n, ast.Name) and n.id not in bound}


def read_run_config(run_dir: Path) -> dict:
    """The run's resolved config.yaml (every run writes it), else Hydra's composed .hydra/config.yaml."""
    run_dir = Path(run_dir)
    for rel in ("config.yaml", ".hydra/config.yaml"):
        path = run_dir / rel
        if path.is_file():
            try:
                config = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError) as exc:
                raise PgolfError(f"{run_dir}: cannot read {rel}: {str(exc).splitlines()[0]}") from None
            if not isinstance(config, dict):
                raise PgolfError(f"{run_dir}: {rel} is not a mapping of config groups")
            return config
    raise PgolfError(f"{run_dir}: no config.yaml or .hydra/config.yaml; give a pgolf run directory (outputs/<run_id>)")


def write_bundle(run_dir: Path, out: Path, *, plain: bool = False) -> Path:
    """Write the standalone script of a run to `out` (atomically): the counted two-line script, or
    with `plain` the readable source; its size is the code bytes a submission of it counts."""
    from pgolf.trainer import write_atomic

    config = read_run_config(run_dir)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, (render(config) if plain else counted_script(config)).encode("utf-8"))
    return out
