#!/usr/bin/env python3
"""onceonly's check that modules form no import cycles (issue 23), run by
.ci/run: shared types belong in a module below both users.

Lists import cycles between the modules of each crate: module A uses
module B (a `crate::b` path anywhere in A's files) and B uses A, directly or
round a loop. Exit 1 where there is one. Modules are the crate root's
children (src/<m>.rs or src/<m>/...), nested modules counted with their
top-level parent."""
import os, re, sys

def crate_dirs(root):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ('target', '.git', 'node_modules')]
        if 'Cargo.toml' in filenames and os.path.isdir(os.path.join(dirpath, 'src')):
            yield dirpath

def modules(src):
    mods = {}
    for dirpath, _, filenames in os.walk(src):
        for f in filenames:
            if not f.endswith('.rs'):
                continue
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, src)
            if rel.startswith('bin' + os.sep) or rel in ('main.rs', 'lib.rs'):
                continue
            top = rel.split(os.sep)[0]
            top = top[:-3] if top.endswith('.rs') else top
            mods.setdefault(top, []).append(path)
    return mods

def strip_tests(text):
    # A module's #[cfg(test)] mod tests may use anything.
    i = text.find('#[cfg(test)]\nmod tests')
    return text if i < 0 else text[:i]

def edges(mods):
    graph = {m: set() for m in mods}
    for m, files in mods.items():
        for path in files:
            text = strip_tests(open(path, encoding='utf-8').read())
            refs = set(re.findall(r'\bcrate::([a-z_][a-z0-9_]*)', text))
            # In a top-level module's own file, `super::x` is the crate's x.
            if os.path.dirname(path) == os.path.dirname(files[0]) and os.path.basename(os.path.dirname(path)) == 'src':
                refs |= set(re.findall(r'\bsuper::([a-z_][a-z0-9_]*)', text))
            for other in refs:
                if other in mods and other != m:
                    graph[m].add(other)
            # `use crate::{a, b::c}` groups
            for group in re.findall(r'\bcrate::\{([^}]*)\}', text, re.S):
                for other in re.findall(r'(?:^|[,{\s])([a-z_][a-z0-9_]*)', group):
                    if other in mods and other != m:
                        graph[m].add(other)
    return graph

def sccs(graph):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    def visit(v):
        index[v] = low[v] = counter[0]; counter[0] += 1
        stack.append(v); on.add(v)
        for w in graph[v]:
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
                out.append(sorted(comp))
    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out

root = sys.argv[1] if len(sys.argv) > 1 else '.'
found = 0
for crate in sorted(crate_dirs(root)):
    graph = edges(modules(os.path.join(crate, 'src')))
    for comp in sccs(graph):
        found += 1
        links = [f'{a} -> {b}' for a in comp for b in sorted(graph[a]) if b in comp]
        print(f'{os.path.relpath(crate, root)}: cycle {" / ".join(comp)}: {", ".join(links)}')
print(f'{found} import cycle(s)')
sys.exit(1 if found else 0)
