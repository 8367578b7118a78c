#!/usr/bin/env bash
# Prints the module graph of one crate's src dir (which module uses which, through `crate::`,
# `super::`, `self::` and a parent's own child-module paths) and exits 1 if files import each
# other in a circle, 2 on a usage error.
#
#   scripts/import-graph.sh [--docs] [--tests] [--where] SRC_DIR
#
# Rules:
# - Nodes are files: `foo.rs` and `foo/mod.rs` are module `foo`, `foo/x.rs` is `foo::x`,
#   `lib.rs` (or `main.rs` when there is no `lib.rs`) is `crate`. A `main.rs` next to a
#   `lib.rs`, and `bin/`, are other crates and are skipped.
# - A use of `crate::foo::x::Item` is an edge to `foo::x`; `crate::foo::Item` to `foo`.
#   A name a module imports or re-exports (`pub use` in `lib.rs`, a parent's `use` named as
#   `super::Name`) resolves to the module it comes from, so `crate::Tensor` is an edge to
#   `tensor`, not to `crate`.
# - A module's uses of its own ancestors (`super::Item`, `crate::parent::Item`) do not count:
#   a child may use its parent. A parent's uses of its children (`child::Item`, `self::child`)
#   do count, so that A -> gpu -> gpu::device -> A is found. `super::sibling` counts.
# - Comments and string literals are ignored. `--docs` also counts `crate::` paths written in
#   doc comments (intra-doc links), which are not imports.
# - Items under `#[cfg(test)]` (the `mod tests { .. }` blocks, test-only `use`s and files)
#   are skipped unless `--tests` is given.
# - `--where` prints, for every edge, the first line that makes it.
set -euo pipefail

exec python3 - "$@" <<'PY'
import os
import re
import sys

args = [a for a in sys.argv[1:] if not a.startswith("--")]
flags = {a for a in sys.argv[1:] if a.startswith("--")}
unknown = flags - {"--docs", "--tests", "--where"}
if len(args) != 1 or unknown or not os.path.isdir(args[0]):
    sys.stderr.write("usage: import-graph.sh [--docs] [--tests] [--where] SRC_DIR\n")
    sys.exit(2)
SRC = args[0].rstrip("/")
DOCS = "--docs" in flags
TESTS = "--tests" in flags
WHERE = "--where" in flags
ROOT = "crate"

# ---- files and module names -------------------------------------------------------------

has_lib = os.path.exists(os.path.join(SRC, "lib.rs"))
files = {}  # module -> path
skipped = []
for dirpath, dirnames, filenames in os.walk(SRC):
    dirnames.sort()
    rel_dir = os.path.relpath(dirpath, SRC)
    parts = [] if rel_dir == "." else rel_dir.split(os.sep)
    if parts and parts[0] == "bin":
        skipped.append(os.path.join(SRC, "bin") + "/")
        dirnames[:] = []
        continue
    for f in sorted(filenames):
        if not f.endswith(".rs"):
            continue
        path = os.path.join(dirpath, f)
        stem = f[:-3]
        if not parts and stem in ("lib", "main"):
            if stem == "main" and has_lib:
                skipped.append(path)
                continue
            mod = ROOT
        elif stem == "mod":
            if not parts:
                skipped.append(path)
                continue
            mod = "::".join(parts)
        else:
            mod = "::".join(parts + [stem])
        files[mod] = path
if ROOT not in files:
    sys.stderr.write(f"{SRC}: no lib.rs or main.rs\n")
    sys.exit(2)


def parent(m):
    if m == ROOT:
        return None
    return ROOT if "::" not in m else m.rsplit("::", 1)[0]


def child(m, name):
    return name if m == ROOT else f"{m}::{name}"


def is_ancestor(a, m):
    p = parent(m)
    while p is not None:
        if p == a:
            return True
        p = parent(p)
    return False


# ---- lexing: blank out comments and literals, keeping offsets and newlines ----------------

def strip(text):
    """Returns (code, docs): code with comments and literals blanked, and the doc comments as
    (offset, text) pairs."""
    out = list(text)
    docs = []
    i, n = 0, len(text)

    def blank(a, b):
        for k in range(a, b):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            if text.startswith(("///", "//!"), i) and not text.startswith("////", i):
                docs.append((i, text[i:j]))
            blank(i, j)
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            if text.startswith(("/**", "/*!"), i) and not text.startswith("/**/", i):
                docs.append((i, text[i:j]))
            blank(i, j)
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:i + 260]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'r(#*)"', text[i:])
            end = text.find('"' + m.group(1), i + len(m.group(0)))
            end = n if end < 0 else end + 1 + len(m.group(1))
            blank(i, end)
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            blank(i, j + 1)
            i = j + 1
        elif c == "'":
            # A char literal ('a', '\n', '\u{..}', '"'), or a lifetime ('a).
            m = re.match(r"'(\\(u\{[0-9a-fA-F]*\}|x..|.)|[^\\'])'", text[i:i + 12])
            if m:
                blank(i, i + len(m.group(0)))
                i += len(m.group(0))
            else:
                i += 1
        else:
            i += 1
    return "".join(out), docs


def matching(code, i):
    """Offset just past the brace that closes the one at `i`."""
    depth = 0
    for j in range(i, len(code)):
        if code[j] == "{":
            depth += 1
        elif code[j] == "}":
            depth -= 1
            if depth == 0:
                return j + 1
    return len(code)


CFG_TEST = re.compile(r"#\s*\[\s*cfg\s*\(\s*(test\s*\)|all\s*\(\s*test\b)")
ATTR = re.compile(r"\s*#\s*\[")
MOD_DECL = re.compile(r"\b(?:pub(?:\s*\([^)]*\))?\s+)?mod\s+(\w+)\s*([;{])")


def test_spans(code):
    """Spans of items under #[cfg(test)], and the names of test-only child files."""
    spans, test_children = [], set()
    for m in CFG_TEST.finditer(code):
        j = m.end()
        # Skip this attribute's remaining brackets and any further attributes.
        depth = 1
        while j < len(code) and depth:
            depth += {"[": 1, "]": -1}.get(code[j], 0)
            j += 1
        while True:
            a = ATTR.match(code, j)
            if not a:
                break
            j, depth = a.end(), 1
            while j < len(code) and depth:
                depth += {"[": 1, "]": -1}.get(code[j], 0)
                j += 1
        semi, brace = code.find(";", j), code.find("{", j)
        decl = MOD_DECL.match(code, j + len(code[j:]) - len(code[j:].lstrip()))
        if decl and decl.group(2) == ";":
            test_children.add(decl.group(1))
        if brace >= 0 and (semi < 0 or brace < semi):
            spans.append((m.start(), matching(code, brace)))
        else:
            spans.append((m.start(), semi + 1 if semi >= 0 else len(code)))
    return spans, test_children


def inside(spans, pos):
    return any(a <= pos < b for a, b in spans)


# ---- use trees ---------------------------------------------------------------------------

IDENT = re.compile(r"\s*(r#)?([A-Za-z_]\w*)")
WS = re.compile(r"\s*")


def parse_tree(code, i, prefix, out):
    """Parses a path or use tree starting at `i` (just after a `::`), appending
    (segments, alias) to `out`. Returns the offset after it."""
    i = WS.match(code, i).end()
    if i < len(code) and code[i] == "{":
        i += 1
        while True:
            i = WS.match(code, i).end()
            if i >= len(code) or code[i] == "}":
                return i + 1
            i = parse_tree(code, i, prefix, out)
            i = WS.match(code, i).end()
            if i < len(code) and code[i] == ",":
                i += 1
    if i < len(code) and code[i] == "*":
        out.append((prefix + ["*"], None))
        return i + 1
    m = IDENT.match(code, i)
    if not m:
        out.append((prefix, None))
        return i
    name, i = m.group(2), m.end()
    j = WS.match(code, i).end()
    if code.startswith("::", j):
        k = WS.match(code, j + 2).end()
        if k < len(code) and (code[k] in "{*" or IDENT.match(code, k)):
            return parse_tree(code, j + 2, prefix + [name], out)
    alias = None
    a = re.compile(r"\s+as\s+([A-Za-z_]\w*)").match(code, i)
    if a:
        alias, i = a.group(1), a.end()
    if name == "self":
        out.append((prefix, alias or (prefix[-1] if prefix else None)))
    else:
        out.append((prefix + [name], alias or name))
    return i


# ---- per file: paths used, re-exports, items defined --------------------------------------

PATH_START = re.compile(r"(?<![\w:$])(crate|super|self|[A-Za-z_]\w*)\s*::")
# Every `use`, public or not: a child's `super::Name` may name its parent's private import.
USE = re.compile(r"(?<![\w$])use\s+")
DEFINES = re.compile(
    r"\b(?:fn|struct|enum|trait|type|const|static|union|mod)\s+([A-Za-z_]\w*)|"
    r"macro_rules!\s*([A-Za-z_]\w*)")

info = {}
for mod, path in files.items():
    text = open(path, encoding="utf-8").read()
    code, docs = strip(text)
    spans, test_children = test_spans(code) if not TESTS else ([], set())
    # Inline (non-file) modules: `super` inside them stays in this file.
    inline = []
    for m in MOD_DECL.finditer(code):
        if m.group(2) == "{":
            b = code.find("{", m.start())
            inline.append((b, matching(code, b)))
    children = {m.group(1) for m in MOD_DECL.finditer(code)
                if m.group(2) == ";" and not inside(spans, m.start())}
    info[mod] = dict(path=path, text=text, code=code, docs=docs, spans=spans,
                     test_children=test_children, inline=inline, children=children)

# Test-only child files (`#[cfg(test)] mod tests;`) are dropped with their subtree.
if not TESTS:
    for mod in list(info):
        for c in info.get(mod, {}).get("test_children", ()):
            cm = child(mod, c)
            for m in list(info):
                if m == cm or m.startswith(cm + "::"):
                    skipped.append(info[m]["path"] + " (cfg(test))")
                    del info[m]
modules = set(info)


def start_module(mod, word, pos):
    """Absolute module a path starting with `word` at `pos` in `mod` begins in, or None if the
    path is not one of ours (an extern crate, a type, a local alias)."""
    depth = sum(1 for a, b in info[mod]["inline"] if a <= pos < b)
    if word == "crate":
        return ROOT
    if word == "self":
        return mod if depth == 0 else None
    if word == "super":
        return None if depth >= 1 else (parent(mod) or ROOT)
    if depth == 0 and word in info[mod]["children"]:
        return "@child"
    return None


def collect(mod, code, base, lines_of, skip_spans):
    """(segments-from-root, offset) for every path of ours in `code`."""
    found = []
    for m in PATH_START.finditer(code):
        pos = base + m.start()
        if skip_spans and inside(info[mod]["spans"], pos):
            continue
        word = m.group(1)
        before = code[max(0, m.start() - 4):m.start()]
        if re.search(r"\bin\s*$", before) and word == "crate":
            continue  # pub(in crate::x): a visibility, not a use
        s = start_module(mod, word, pos)
        if s is None:
            continue
        out = []
        if s == "@child":
            parse_tree(code, m.start(), [] if mod == ROOT else mod.split("::"), out)
        else:
            prefix = [] if s == ROOT else s.split("::")
            # `super::super::x`
            i = m.end()
            while True:
                k = re.compile(r"\s*super\s*::").match(code, i)
                if not k or word != "super":
                    break
                prefix, i = prefix[:-1], k.end()
            parse_tree(code, i, prefix, out)
        for segs, alias in out:
            found.append((segs, alias, pos))
    return found


reexports = {m: {} for m in modules}   # module -> name imported or re-exported -> absolute path
globs = {m: [] for m in modules}       # module -> [absolute segments]
defined = {m: set() for m in modules}
uses = {}
for mod in modules:
    d = info[mod]
    code = d["code"]
    for m in DEFINES.finditer(code):
        if not inside(d["spans"], m.start()):
            defined[mod].add(m.group(1) or m.group(2))
    for m in USE.finditer(code):
        if inside(d["spans"], m.start()):
            continue
        end = code.find(";", m.end())
        stmt = code[m.end():end]
        w = PATH_START.match(stmt.lstrip())
        if not w:
            continue
        for segs, alias, _ in collect(mod, stmt.lstrip(), m.end(), None, False):
            if segs and segs[-1] == "*":
                globs[mod].append(segs[:-1])
            elif alias:
                reexports[mod][alias] = segs
    found = collect(mod, code, 0, None, True)
    if DOCS:
        for off, doc in d["docs"]:
            if inside(d["spans"], off):
                continue
            for m in re.finditer(r"(?<![\w:])crate::[\w:]+", doc):
                out = []
                parse_tree(doc, m.start() + len("crate::"), [], out)
                found += [(s, a, off + m.start()) for s, a in out]
    uses[mod] = found


def resolve(segs, depth=0):
    """The module a path from the crate root lands in."""
    cur, i = ROOT, 0
    while i < len(segs):
        name = segs[i]
        nxt = child(cur, name)
        if name == "*":
            break
        if nxt in modules:
            cur, i = nxt, i + 1
            continue
        if depth < 8 and name not in defined[cur]:
            if name in reexports[cur]:
                return resolve(reexports[cur][name] + segs[i + 1:], depth + 1)
            for g in globs[cur]:
                target = resolve(g, depth + 1)
                if name in defined.get(target, ()) or name in reexports.get(target, {}):
                    return resolve(g + segs[i:], depth + 1)
        break
    return cur


# ---- the graph ---------------------------------------------------------------------------

edges = {m: {} for m in modules}  # module -> target -> first line
for mod in modules:
    text = info[mod]["text"]
    for segs, _, pos in uses[mod]:
        t = resolve(segs)
        if t == mod or is_ancestor(t, mod):
            continue
        line = text.count("\n", 0, pos) + 1
        prev = edges[mod].get(t)
        edges[mod][t] = line if prev is None else min(prev, line)


def order(m):
    return (m != ROOT, m)


what = "crate::, super::, self:: and child-module paths; comments"
what += (", doc links counted" if DOCS else " and doc links ignored")
what += ("" if not TESTS else "; #[cfg(test)] items included")
what += ("; #[cfg(test)] items skipped" if not TESTS else "")
print(f"module graph of {SRC} ({what})")
for s in skipped:
    print(f"  (skipped {s})")
for m in sorted(modules, key=order):
    targets = sorted(edges[m], key=order)
    if WHERE:
        rel = os.path.relpath(info[m]["path"], SRC)
        shown = " ".join(f"{t}@{rel}:{edges[m][t]}" for t in targets)
    else:
        shown = " ".join(targets)
    print(f"{m} -> {shown}" if targets else f"{m}")

# Tarjan's strongly connected components (iterative).
index, low, on, stack, sccs, counter = {}, {}, set(), [], [], [0]
for root in sorted(modules, key=order):
    if root in index:
        continue
    work = [(root, iter(sorted(edges[root], key=order)))]
    index[root] = low[root] = counter[0]
    counter[0] += 1
    stack.append(root)
    on.add(root)
    while work:
        v, it = work[-1]
        pushed = False
        for w in it:
            if w not in index:
                index[w] = low[w] = counter[0]
                counter[0] += 1
                stack.append(w)
                on.add(w)
                work.append((w, iter(sorted(edges[w], key=order))))
                pushed = True
                break
            if w in on:
                low[v] = min(low[v], index[w])
        if pushed:
            continue
        work.pop()
        if work:
            low[work[-1][0]] = min(low[work[-1][0]], low[v])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp, key=order))


def shortest_cycle(comp, start):
    inside_ = set(comp)
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v], key=order):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return list(reversed(path)) + [start]
                if w in inside_ and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return [start]


if not sccs:
    print("no cycles")
    sys.exit(0)
for comp in sccs:
    print(f"CYCLE among {len(comp)} modules: {' '.join(comp)}")
    seen = set()
    for m in comp:
        cyc = shortest_cycle(comp, m)
        key = frozenset(zip(cyc, cyc[1:]))
        if key in seen:
            continue
        seen.add(key)
        hops = []
        for a, b in zip(cyc, cyc[1:]):
            rel = os.path.relpath(info[a]["path"], SRC)
            hops.append(f"{a} ({rel}:{edges[a][b]})")
        print("  " + " -> ".join(hops) + f" -> {cyc[-1]}")
sys.exit(1)
PY
