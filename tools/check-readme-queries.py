#!/usr/bin/env python3
"""Check that sql/readme_queries.sql runs the README's queries as written.

The regression test readme_queries proves the SQL of the README's sections
"Querying the marts" and "How an app consumes tags" on data of its own; it
can only prove what it holds.  Each statement of those sections' sql
blocks must appear in it, spaces aside, with the ids of the test's data in
place of the README's (the table below), as a statement or a subquery.
Exits 1 naming each statement missing.  Used by tools/lint.sh.
"""
import re
import sys

README = "README.md"
TEST = "sql/readme_queries.sql"
SECTIONS = ("## Querying the marts", "### How an app consumes tags")
# README's value -> the test's.
SUBSTITUTIONS = {
    "'626a81ce9a8cd1920641e249'": "'u1'",
    "'pizza lover'": "'pastry lover'",
}


def section(text, heading):
    start = text.index("\n" + heading + "\n")
    level = heading.split(" ")[0]
    end = re.compile(r"^#{1,%d} " % len(level), re.M)
    m = end.search(text, start + len(heading) + 2)
    return text[start:m.start() if m else len(text)]


def statements(sql):
    lines = [ln for ln in sql.splitlines() if not ln.lstrip().startswith("--")]
    for stmt in "\n".join(lines).split(";"):
        stmt = " ".join(stmt.split())
        if stmt:
            yield stmt


def normal(s):
    return " ".join(s.split())


def main():
    readme = open(README, encoding="utf-8").read()
    test = normal(open(TEST, encoding="utf-8").read())
    missing = []
    found = 0
    for heading in SECTIONS:
        for block in re.findall(r"^```sql\n(.*?)^```", section(readme, heading), re.M | re.S):
            for stmt in statements(block):
                for old, new in SUBSTITUTIONS.items():
                    stmt = stmt.replace(old, new)
                found += 1
                # As a statement, or wrapped as a subquery (to hide times).
                if not re.search(re.escape(stmt) + r" ?[;)]", test):
                    missing.append(f"{heading}: {stmt}")
    if found == 0:
        sys.exit(f"{README}: no sql blocks found under {SECTIONS}")
    for m in missing:
        print(f"{TEST} does not run this query of {README} ({m})", file=sys.stderr)
    sys.exit(1 if missing else 0)


if __name__ == "__main__":
    main()
