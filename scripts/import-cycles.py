#!/usr/bin/env python3
"""The graph of src/ modules by their `crate::` paths (uses and inline paths), and its cycles.

A module is a top-level module of the crate (src/x.rs or src/x/): its submodules count as it.
Prints each module's dependencies, then every cycle (strongly connected component) found, and
exits 1 if there is one. Usage: scripts/import-cycles.py [src]"""
import os, re, sys

SRC = sys.argv[1] if len(sys.argv) > 1 else "src"
PATH = re.compile(r'\bcrate::(\w+)')
GROUP = re.compile(r'\bcrate::\{([^}]*)\}')

def module_of(path):
    rel = os.path.relpath(path, SRC)
    top = rel.split(os.sep)[0]
    return top[:-3] if top.endswith('.rs') else top

graph = {}
for dirpath, _, files in os.walk(SRC):
    for f in files:
        if not f.endswith('.rs'):
            continue
        path = os.path.join(dirpath, f)
        mod = module_of(path)
        if mod in ('lib', 'main') or path.startswith(os.path.join(SRC, 'bin')):
            continue
        deps = graph.setdefault(mod, set())
        text = open(path, encoding='utf-8').read()
        text = re.sub(r'//[^\n]*', '', text)  # comments and doc links are not dependencies
        for m in PATH.finditer(text):
            deps.add(m.group(1))
        for m in GROUP.finditer(text):
            for item in m.group(1).split(','):
                name = item.strip().split('::')[0].split(' ')[0]
                if name and name not in ('self',):
                    deps.add(name)
for mod in graph:
    graph[mod].discard(mod)
    graph[mod] = {d for d in graph[mod] if d in graph}

# Tarjan's strongly connected components.
index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]
def visit(v):
    index[v] = low[v] = counter[0]; counter[0] += 1
    stack.append(v); on.add(v)
    for w in sorted(graph[v]):
        if w not in index:
            visit(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v: break
        sccs.append(comp)
sys.setrecursionlimit(10000)
for v in sorted(graph):
    if v not in index:
        visit(v)

for mod in sorted(graph):
    print(f"{mod:12} -> {', '.join(sorted(graph[mod])) or '(none)'}")
cycles = [sorted(c) for c in sccs if len(c) > 1]
edges = sum(len(d) for d in graph.values())
print(f"{len(graph)} modules, {edges} edges, {len(cycles)} cycles")
for c in cycles:
    print("cycle among:", ", ".join(c))
sys.exit(1 if cycles else 0)
