#!/usr/bin/env bash
#! Checks the shape of every crate's module graph from its `crate::`/`super::`/`self::` paths: no import circle
#! between the files of one crate, and nothing under controller/src/executor/ importing the rest of the crate (the
#! engine stays pure: its effects come in through traits). A parent's own `mod`/`pub use` of its children is
#! structure, not a dependency, and code after the first `#[cfg(test)]` of a file is not looked at.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 - "$@" <<'PY'
import pathlib, re, sys

PURE = {"patchctl": [["executor"]]}  # crate name -> module paths that may import only from themselves
# Circles known and owned elsewhere (apply is being reshaped on another branch): reported, not failed. Remove an
# entry once its circle is gone.
KNOWN: set = set()

def module_path(src, file):
    parts = list(file.relative_to(src).with_suffix("").parts)
    if parts[-1] in ("lib", "main") and len(parts) == 1:
        return []
    if parts[-1] == "mod":
        parts = parts[:-1]
    return parts

def strip_comments(text):
    text = text.split("#[cfg(test)]", 1)[0]
    # One left-to-right pass, so a quote in a comment or a `//` or `/*` in a string cannot hide the code after it.
    token = re.compile(r"//[^\n]*|/\*.*?\*/|\"(?:\\.|[^\"\\])*\"|'(?:\\.|[^'\\])'", re.S)
    return token.sub(lambda m: '""' if m.group(0)[0] in "\"'" else "", text)

def expand(tree):
    """`a::{b, c::{d, e}}` -> [a::b, a::c::d, a::c::e] (good enough for use trees)."""
    tree = tree.replace(" ", "").replace("\n", "")
    m = re.match(r"^(.*?)\{(.*)\}$", tree)
    if not m:
        return [tree]
    prefix, inner = m.group(1), m.group(2)
    items, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            items.append(cur); cur = ""; continue
        depth += ch == "{"; depth -= ch == "}"; cur += ch
    items.append(cur)
    return [p for item in items if item for p in expand(prefix + item)]

def paths_in(text):
    for use in re.finditer(r"\buse\s+([^;]+);", text):
        for path in expand(use.group(1)):
            yield path.split(" as ")[0]
    for inline in re.finditer(r"(?<![\w:])((?:crate|super|self)(?:::\w+)+)", text):
        yield inline.group(1)

failures = []
for manifest in sorted(pathlib.Path(".").glob("*/Cargo.toml")):
    src = manifest.parent / "src"
    if not src.is_dir():
        continue
    crate = re.search(r'^name\s*=\s*"([^"]+)"', manifest.read_text(), re.M).group(1)
    files = {tuple(module_path(src, f)): f for f in src.rglob("*.rs")}
    edges = {}
    for mod, file in files.items():
        is_dir_module = file.name in ("mod.rs", "lib.rs", "main.rs")
        here = list(mod) if is_dir_module else list(mod[:-1])  # the module `super::` starts from
        targets = set()
        for path in paths_in(strip_comments(file.read_text())):
            parts = path.split("::")
            if parts[0] == "crate":
                absolute = parts[1:]
            elif parts[0] == "self":
                absolute = list(mod) + parts[1:]
            else:
                base = list(mod)
                while parts and parts[0] == "super":
                    base = base[:-1]; parts = parts[1:]
                absolute = base + parts
            for cut in range(len(absolute), -1, -1):
                if tuple(absolute[:cut]) in files:
                    target = tuple(absolute[:cut]); break
            if target == mod or target[: len(mod)] == mod:
                continue  # itself, or a child: structure
            targets.add(target)
            for pure in PURE.get(crate, []):
                if list(mod[: len(pure)]) == pure and list(target[: len(pure)]) != pure:
                    failure = f"{file}: imports crate::{'::'.join(target)} from outside {'::'.join(pure)}"
                    if failure not in failures:
                        failures.append(failure)
        edges[mod] = targets
    # A circle is a strongly connected component of more than one file (Tarjan).
    index, low, stack, on, counter, comps = {}, {}, [], set(), [0], []
    def visit(v):
        index[v] = low[v] = counter[0]; counter[0] += 1; stack.append(v); on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1:
                comps.append(comp)
    sys.setrecursionlimit(10000)
    for v in list(edges):
        if v not in index:
            visit(v)
    for comp in comps:
        names = tuple(sorted(str(files[m]) for m in comp))
        message = f"{crate}: import circle between " + ", ".join(names)
        if names in KNOWN:
            print(f"check_imports: known, not failed: {message}", file=sys.stderr)
        else:
            failures.append(message)

if failures:
    print("check_imports: FAILED", *failures, sep="\n  ", file=sys.stderr)
    sys.exit(1)
print("check_imports: no import circle (beyond the known ones above); controller/src/executor imports only itself")
PY
