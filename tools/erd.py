#!/usr/bin/env python3
"""Entity-relationship diagram of dwh's tables, from the live catalog, as
Graphviz DOT on stdout.

Reads pg_catalog through psql (the libpq environment, PGHOST and so on,
says where; tools/erd.sh starts a throw-away cluster for it): every table
of the schemas stg, dds, cdm and dwh with its comment, its columns with
their types, NOT NULL, primary key and comments, and draws

- the foreign keys (solid arrows, from the referring column to the
  referenced one), and
- the references that statement-level triggers enforce instead of foreign
  keys (dashed arrows): a table with a trigger that runs
  dwh.order_references_exist() refers, through each column that its
  dwh.order_references_kept() trigger guards (UPDATE OF ...), to the table
  of the same schema whose primary key is that one column
  (install/20_dds.sql).  A referring table for which that finds nothing
  stops the script, so that the picture never drops a reference silently.

The graph's comment holds the SHA-256 of the rest of the DOT text; dot
copies it into the SVG, so a test can tell that a picture was drawn from
the catalog of this build whatever the fonts and the layout of the
machine that drew it.  Text is in DejaVu Sans (fonts-dejavu-core).

Standard library only.  Usage: erd.py [--psql PATH] [--title TEXT]
"""

import argparse
import hashlib
import json
import subprocess
import sys
import textwrap

SCHEMAS = ["stg", "dds", "cdm", "dwh"]

SCHEMA_TITLES = {
    "stg": "stg: data as it arrived",
    "dds": "dds: Data Vault (hubs h_, links l_, satellites s_)",
    "cdm": "cdm: counter marts",
    "dwh": "dwh: operational tables",
}

# Columns of tables a schema without references between its tables is laid
# out in (left to right: stg, dds, cdm, dwh); dds is laid out by its
# references, links and satellites left of their hubs.
SCHEMA_COLUMNS = {"stg": 2, "cdm": 1, "dwh": 2}

SCHEMA_COLOURS = {
    "stg": "#fff4e0",
    "dds": "#e8f1fb",
    "cdm": "#e9f7ec",
    "dwh": "#f2f2f2",
}

CATALOG_QUERY = r"""
WITH tables AS (
    SELECT c.oid, n.nspname AS schema, c.relname AS name
    FROM pg_catalog.pg_class c
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = ANY (:'schemas'::text[])
      AND c.relkind IN ('r', 'p') AND NOT c.relispartition
),
pk AS (
    SELECT con.conrelid, con.conkey
    FROM pg_catalog.pg_constraint con
    WHERE con.contype = 'p' AND con.conrelid IN (SELECT oid FROM tables)
),
trigger_refs AS (
    -- Tables whose references a statement trigger checks, and the
    -- columns that their guard trigger keeps from being updated.
    SELECT t.oid, array_agg(DISTINCT a.attname ORDER BY a.attname) AS columns
    FROM tables t
    JOIN pg_catalog.pg_trigger chk ON chk.tgrelid = t.oid
        AND chk.tgfoid = 'dwh.order_references_exist()'::pg_catalog.regprocedure
    LEFT JOIN pg_catalog.pg_trigger kept ON kept.tgrelid = t.oid
        AND kept.tgfoid = 'dwh.order_references_kept()'::pg_catalog.regprocedure
    LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = t.oid
        AND a.attnum = ANY (kept.tgattr::int2[])
    GROUP BY t.oid
)
SELECT json_build_object(
  'tables', (
    SELECT json_agg(json_build_object(
        'schema', t.schema,
        'name', t.name,
        'comment', pg_catalog.obj_description(t.oid, 'pg_class'),
        'trigger_ref_columns', (SELECT tr.columns FROM trigger_refs tr WHERE tr.oid = t.oid),
        'has_reference_trigger', EXISTS (SELECT FROM trigger_refs tr WHERE tr.oid = t.oid),
        'primary_key', (
            SELECT json_agg(a.attname ORDER BY k.ord)
            FROM pk, unnest(pk.conkey) WITH ORDINALITY AS k(attnum, ord)
            JOIN pg_catalog.pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum
            WHERE pk.conrelid = t.oid),
        'columns', (
            SELECT json_agg(json_build_object(
                'name', a.attname,
                'type', pg_catalog.format_type(a.atttypid, a.atttypmod),
                'not_null', a.attnotnull,
                'generated', a.attgenerated <> '',
                'comment', pg_catalog.col_description(t.oid, a.attnum))
              ORDER BY a.attnum)
            FROM pg_catalog.pg_attribute a
            WHERE a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped))
      ORDER BY array_position(:'schemas'::text[], t.schema::text), t.name)
    FROM tables t),
  'foreign_keys', (
    SELECT coalesce(json_agg(json_build_object(
        'name', con.conname,
        'from_schema', fn.nspname, 'from_table', fc.relname,
        'from_columns', (SELECT json_agg(a.attname ORDER BY k.ord)
                         FROM unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord)
                         JOIN pg_catalog.pg_attribute a
                           ON a.attrelid = con.conrelid AND a.attnum = k.attnum),
        'to_schema', tn.nspname, 'to_table', tc.relname,
        'to_columns', (SELECT json_agg(a.attname ORDER BY k.ord)
                       FROM unnest(con.confkey) WITH ORDINALITY AS k(attnum, ord)
                       JOIN pg_catalog.pg_attribute a
                         ON a.attrelid = con.confrelid AND a.attnum = k.attnum))
      ORDER BY fn.nspname, fc.relname, con.conname), '[]'::json)
    FROM pg_catalog.pg_constraint con
    JOIN pg_catalog.pg_class fc ON fc.oid = con.conrelid
    JOIN pg_catalog.pg_namespace fn ON fn.oid = fc.relnamespace
    JOIN pg_catalog.pg_class tc ON tc.oid = con.confrelid
    JOIN pg_catalog.pg_namespace tn ON tn.oid = tc.relnamespace
    WHERE con.contype = 'f' AND con.conrelid IN (SELECT oid FROM tables))
)
"""


def read_catalog(psql):
    """The catalog as a dict, through psql."""
    schemas = "{" + ",".join(SCHEMAS) + "}"
    out = subprocess.run(
        [psql, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
         "-v", "schemas=" + schemas],
        input=CATALOG_QUERY, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit("erd.py: psql failed: " + out.stderr.strip())
    return json.loads(out.stdout)


def trigger_references(tables):
    """References enforced by triggers: (schema, table, column, schema,
    hub, hub column), from the columns each referring table's guard
    trigger names and the hubs (h_*) whose primary key is that column
    (another table keyed by a hub's key, dds.product_namings, is not
    referred to)."""
    by_pk = {}
    for t in tables:
        if (t["primary_key"] and len(t["primary_key"]) == 1
                and t["name"].startswith("h_")):
            by_pk[(t["schema"], t["primary_key"][0])] = t["name"]
    refs = []
    for t in tables:
        if not t["has_reference_trigger"]:
            continue
        found = 0
        for col in t["trigger_ref_columns"] or []:
            target = by_pk.get((t["schema"], col))
            if target is None or target == t["name"]:
                continue
            refs.append((t["schema"], t["name"], col, t["schema"], target, col))
            found += 1
        if found == 0:
            sys.exit(f"erd.py: {t['schema']}.{t['name']} has a reference trigger, "
                     "but no column of its guard trigger is a hub's primary key")
    return refs


def esc(text):
    """Text for a Graphviz HTML label."""
    return (text.replace("&", "&amp;").replace("<", "&lt;")
            .replace(">", "&gt;").replace('"', "&quot;"))


def wrapped(text, width):
    """Comment text wrapped to lines of width, joined with <BR/>."""
    lines = textwrap.wrap(" ".join(text.split()), width) or [""]
    return '<BR ALIGN="LEFT"/>'.join(esc(line) for line in lines) + '<BR ALIGN="LEFT"/>'


def node_id(schema, table):
    return f"{schema}__{table}"


def table_label(t, fk_columns, trigger_columns):
    """The HTML label of one table: title, comment, one row per column."""
    pk = set(t["primary_key"] or [])
    rows = []
    rows.append(
        f'<TR><TD COLSPAN="3" BGCOLOR="#34495e" ALIGN="LEFT">'
        f'<FONT COLOR="white"><B>{esc(t["schema"])}.{esc(t["name"])}</B></FONT></TD></TR>')
    if t["comment"]:
        rows.append(
            f'<TR><TD COLSPAN="3" ALIGN="LEFT" BALIGN="LEFT">'
            f'<FONT POINT-SIZE="9"><I>{wrapped(t["comment"], 60)}</I></FONT></TD></TR>')
    for c in t["columns"]:
        marks = []
        if c["name"] in pk:
            marks.append("PK")
        if c["name"] in fk_columns:
            marks.append("FK")
        if c["name"] in trigger_columns:
            marks.append("TR")
        name = esc(c["name"])
        if c["name"] in pk:
            name = f"<B>{name}</B>"
        if not c["not_null"]:
            name = f'{name} <FONT COLOR="#7f8c8d">?</FONT>'
        if marks:
            name = f'<FONT POINT-SIZE="8" COLOR="#c0392b">{" ".join(marks)}</FONT> {name}'
        comment = (f'<FONT POINT-SIZE="8" COLOR="#555555">{wrapped(c["comment"], 48)}</FONT>'
                   if c["comment"] else " ")
        port = esc(c["name"])
        rows.append(
            f'<TR><TD ALIGN="LEFT" PORT="{port}_l">{name}</TD>'
            f'<TD ALIGN="LEFT"><FONT COLOR="#2c3e50">{esc(c["type"])}</FONT></TD>'
            f'<TD ALIGN="LEFT" BALIGN="LEFT" PORT="{port}_r">{comment}</TD></TR>')
    return ('<<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0" CELLPADDING="3" '
            'BGCOLOR="white">' + "".join(rows) + "</TABLE>>")


def layout_edges(tables, fks, trefs):
    """Invisible edges that place the schemas side by side, left to right,
    each in columns of tables: in SCHEMA_COLUMNS columns, or, for a schema
    with references inside, referring tables left of referred ones."""
    refs = {(fk["from_schema"], fk["from_table"], fk["to_schema"], fk["to_table"]) for fk in fks}
    refs |= {(s, t, ts, tt) for (s, t, _, ts, tt, _) in trefs}
    out = []
    previous_last = None
    for schema in SCHEMAS:
        names = [t["name"] for t in tables if t["schema"] == schema]
        if not names:
            continue
        inner = [(t, tt) for (s, t, ts, tt) in refs if s == schema and ts == schema]
        if inner:
            referring = {t for (t, _) in inner}
            first = [n for n in names if n in referring]
            last = [n for n in names if n not in referring]
        else:
            columns = SCHEMA_COLUMNS.get(schema, 1)
            per_column = -(-len(names) // columns)
            grid = [names[i:i + per_column] for i in range(0, len(names), per_column)]
            for left, right in zip(grid, grid[1:]):
                for a, b in zip(left, right):
                    out.append(f"  {node_id(schema, a)} -> {node_id(schema, b)} [style=invis];")
            first, last = grid[0], grid[-1]
        if previous_last:
            for name in first:
                out.append(f"  {node_id(*previous_last)} -> {node_id(schema, name)} [style=invis];")
        previous_last = (schema, last[0])
    return out


def dot(catalog, title):
    tables = catalog["tables"]
    fks = catalog["foreign_keys"]
    trefs = trigger_references(tables)

    fk_cols = {}
    for fk in fks:
        fk_cols.setdefault((fk["from_schema"], fk["from_table"]), set()).update(fk["from_columns"])
    tr_cols = {}
    for (s, t, c, _, _, _) in trefs:
        tr_cols.setdefault((s, t), set()).add(c)

    out = []
    out.append("digraph vault {")
    out.append('  graph [rankdir=LR, fontname="DejaVu Sans", fontsize=20, labelloc=t, '
               'nodesep=0.3, ranksep=1.2, newrank=true, '
               f'label=<<B>{esc(title)}</B>: tables of stg, dds, cdm and dwh, from the catalog'
               '<BR/><FONT POINT-SIZE="12">PK primary key, FK foreign key (solid arrow), '
               'TR reference checked by a statement trigger, dwh.order_references_exist() '
               '(dashed arrow); ? nullable</FONT>>];')
    out.append('  node [shape=plain, fontname="DejaVu Sans", fontsize=10];')
    out.append('  edge [fontname="DejaVu Sans", fontsize=9, arrowhead=normal];')
    for schema in SCHEMAS:
        members = [t for t in tables if t["schema"] == schema]
        if not members:
            continue
        out.append(f"  subgraph cluster_{schema} {{")
        out.append(f'    label=<<B>{esc(SCHEMA_TITLES[schema])}</B>>; style=filled; '
                   f'color="#bbbbbb"; fillcolor="{SCHEMA_COLOURS[schema]}"; fontsize=16;')
        for t in members:
            key = (t["schema"], t["name"])
            out.append(f"    {node_id(*key)} [label={table_label(t, fk_cols.get(key, set()), tr_cols.get(key, set()))}];")
        out.append("  }")
    out.extend(layout_edges(tables, fks, trefs))
    for fk in fks:
        for fc, tc in zip(fk["from_columns"], fk["to_columns"]):
            out.append(
                f'  {node_id(fk["from_schema"], fk["from_table"])}:"{esc(fc)}_r" -> '
                f'{node_id(fk["to_schema"], fk["to_table"])}:"{esc(tc)}_l" '
                f'[color="#2c3e50", tooltip="{esc(fk["name"])}"];')
    for (s, t, c, ts, tt, tc) in trefs:
        out.append(
            f'  {node_id(s, t)}:"{esc(c)}_r" -> {node_id(ts, tt)}:"{esc(tc)}_l" '
            f'[color="#8e44ad", style=dashed, '
            f'tooltip="checked by trigger references_exist (dwh.order_references_exist)"];')
    out.append("}")
    text = "\n".join(out) + "\n"
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return text.replace("digraph vault {\n",
                        f'digraph vault {{\n  comment="erd.py catalog sha256:{digest}";\n', 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--psql", default="psql", help="psql to run (default: psql)")
    parser.add_argument("--title", default="dwh", help="title of the diagram")
    args = parser.parse_args()
    sys.stdout.write(dot(read_catalog(args.psql), args.title))


if __name__ == "__main__":
    main()
