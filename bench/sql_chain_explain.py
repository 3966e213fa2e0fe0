#!/usr/bin/env python3
"""Summarise auto_explain JSON plans (sent to the client as NOTICEs) for
bench/sql_chain.sh: the statements by duration, the triggers by time,
then the plan nodes by their own time (total time x loops minus that of
their children).  Foreign-key checks (one tiny statement per row) are
summed into one line.

usage: sql_chain_explain.py FILE [TOP]
"""
import json
import re
import sys

RI_QUERY = re.compile(r'^SELECT 1 FROM ONLY "([^"]+)"\."([^"]+)"')


def plans(text):
    """Yield (duration_ms, plan dict) from psql's stderr."""
    parts = re.split(r"(?m)^(?:psql:[^\n]*?)?NOTICE:\s+duration: ([0-9.]+) ms\s+plan:\s*\n", text)
    for i in range(1, len(parts), 2):
        body = parts[i + 1]
        # The JSON object ends at the first line that is a lone "}".
        end = re.search(r"(?m)^}\s*$", body)
        if end is None:
            continue
        try:
            yield float(parts[i]), json.loads(body[: end.end()])
        except ValueError:
            continue


def describe(node):
    what = node.get("Node Type", "?")
    if node.get("Operation") and what == "ModifyTable":
        what = node["Operation"]
    if "Relation Name" in node:
        what += " on " + node["Relation Name"]
    if "Index Name" in node:
        what += " using " + node["Index Name"]
    if "Function Name" in node:
        what += " " + node["Function Name"]
    if "CTE Name" in node:
        what += " " + node["CTE Name"]
    if "Subplan Name" in node:
        what += " (" + node["Subplan Name"] + ")"
    return what


def walk(node, out, stmt):
    loops = node.get("Actual Loops", 1) or 0
    total = node.get("Actual Total Time", 0.0) * loops
    children = node.get("Plans", [])
    child_total = sum(c.get("Actual Total Time", 0.0) * (c.get("Actual Loops", 1) or 0)
                      for c in children)
    # CTE scans drive their CTE and may count it twice: clamp at zero.
    own = max(total - child_total, 0.0)
    out.append((own, stmt, describe(node), node.get("Actual Rows", 0), loops))
    for c in children:
        walk(c, out, stmt)


def main():
    text = open(sys.argv[1], encoding="utf-8", errors="replace").read()
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 12
    found = list(plans(text))
    if not found:
        print("  (no plans captured)")
        return
    stmts, nodes, triggers, ri = [], [], {}, {}
    n = 0
    for ms, doc in found:
        query = re.sub(r"\s+", " ", doc.get("Query Text", "")).strip()
        m = RI_QUERY.match(query)
        if m:
            key = m.group(1) + "." + m.group(2)
            cnt, tot = ri.get(key, (0, 0.0))
            ri[key] = (cnt + 1, tot + ms)
            continue
        n += 1
        stmts.append((ms, n, query))
        if doc.get("Plan"):
            walk(doc["Plan"], nodes, n)
        for t in doc.get("Triggers", []):
            key = (t.get("Trigger Name", "?"), t.get("Relation", "?"))
            calls, tot = triggers.get(key, (0, 0.0))
            triggers[key] = (calls + t.get("Calls", 0), tot + t.get("Time", 0.0))
    print("  statements by duration (ms, #, text; nested ones are inside their caller):")
    for ms, i, query in sorted(stmts, reverse=True)[:9]:
        print("  %9.1f  #%-3d %s" % (ms, i, query[:90]))
    for key, (cnt, tot) in sorted(ri.items(), key=lambda x: -x[1][1]):
        print("  %9.1f       foreign-key checks of %s: %d one-row statements" % (tot, key, cnt))
    print("  triggers by time (ms, calls, trigger on table):")
    for (name, rel), (calls, tot) in sorted(triggers.items(), key=lambda x: -x[1][1])[:7]:
        print("  %9.1f  %6d  %s on %s" % (tot, calls, name, rel))
    print("  plan nodes by own time (ms, statement #, node, rows x loops):")
    for own, i, what, rows, loops in sorted(nodes, key=lambda x: -x[0])[:top]:
        print("  %9.1f  #%-3d %-60s %7s x %s" % (own, i, what[:60], rows, loops))


if __name__ == "__main__":
    main()
