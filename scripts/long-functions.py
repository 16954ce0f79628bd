#!/usr/bin/env python3
"""Lists Rust functions longer than a limit (LIMIT, default 80: lines from the `fn` line to its
closing brace). Usage: scripts/long-functions.py src bench test-support tests/common"""
import os, re, sys

LIMIT = int(os.environ.get("LIMIT", "80"))
FN = re.compile(r'^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+"[^"]*"\s+)?fn\s+(\w+)')

def strip(line):
    # Drop comments, string and char literals so their braces do not count.
    line = re.sub(r'b?r#*"[^"]*"#*', '""', line)
    line = re.sub(r'b?"(\\.|[^"\\])*"', '""', line)
    line = re.sub(r"b?'(\\.|[^'\\])'", "''", line)
    return line.split('//', 1)[0]

def scan(path):
    lines = open(path, encoding='utf-8').read().split('\n')
    out = []
    i = 0
    while i < len(lines):
        m = FN.match(lines[i])
        if not m:
            i += 1
            continue
        depth, started, j = 0, False, i
        while j < len(lines):
            code = strip(lines[j])
            if not started and ';' in code and '{' not in code:
                break  # a declaration without a body
            for ch in code:
                if ch == '{':
                    depth += 1; started = True
                elif ch == '}':
                    depth -= 1
            if started and depth == 0:
                out.append((j - i + 1, path, i + 1, m.group(7)))
                break
            j += 1
        i += 1
    return out

found = []
for root in sys.argv[1:]:
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith('.rs'):
                found += scan(os.path.join(dirpath, f))
long = sorted((f for f in found if f[0] > LIMIT), reverse=True)
for n, path, line, name in long:
    print(f"{n:4} {path}:{line} {name}")
print(f"{len(found)} functions, {len(long)} over {LIMIT} lines", file=sys.stderr)
sys.exit(1 if long else 0)
