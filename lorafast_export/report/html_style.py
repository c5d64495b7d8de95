"""The stylesheet inlined into report.html (kept apart so html.py reads as structure)."""

CSS = """
:root { --ink:#1e293b; --muted:#64748b; --line:#e2e8f0; --bg:#f6f8fb; --card:#fff;
        --ok:#15803d; --bad:#b91c1c; --warn:#b45309; }
* { box-sizing:border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
       font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif; }
main { max-width:1120px; margin:0 auto; padding:28px 24px 48px; }
header { display:flex; justify-content:space-between; align-items:flex-start; gap:16px; margin-bottom:18px; }
h1 { font-size:22px; margin:0 0 4px; font-weight:650; letter-spacing:-.01em; }
h2 { font-size:16px; margin:0 0 10px; font-weight:650; }
.meta { color:var(--muted); } .meta code { color:var(--ink); }
p.runtime-note { margin:8px 0 0; padding:6px 10px; border-left:3px solid var(--warn); background:#fffbeb; }
.badge { font-weight:700; font-size:13px; letter-spacing:.06em; padding:6px 14px; border-radius:999px;
         color:#fff; }
.badge.pass { background:var(--ok); } .badge.fail { background:var(--bad); }
section { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:18px 20px;
          margin:0 0 16px; }
.cards { display:grid; grid-template-columns:repeat(4,1fr); gap:12px; margin-bottom:16px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:12px 16px; }
.card .k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.05em; }
.card .v { font-size:22px; font-weight:650; font-variant-numeric:tabular-nums; }
.card .s { color:var(--muted); font-size:12px; }
.grid2 { display:grid; grid-template-columns:1fr 1fr; gap:18px; }
p.lead { margin:0 0 12px; } p.note { color:var(--muted); font-size:12px; margin:8px 0 0; }
table { border-collapse:collapse; width:100%; font-variant-numeric:tabular-nums; font-size:13px; }
th, td { padding:5px 8px; border-bottom:1px solid var(--line); text-align:right; white-space:nowrap; }
th { color:var(--muted); font-weight:600; font-size:12px; background:#f8fafc; }
th:first-child, td:first-child, td.l, th.l { text-align:left; }
tr.first td { border-top:2px solid var(--line); }
.scroll { overflow-x:auto; }
td.ok { color:var(--ok); font-weight:600; } td.bad { color:var(--bad); font-weight:600; }
td.warn { color:var(--warn); font-weight:600; } td.wrap { white-space:normal; color:var(--muted); }
tr.gate-bad td { background:#fef2f2; } tr.gate-warn td { background:#fffbeb; }
code { font:12.5px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; }
.chart { width:100%; height:auto; display:block; }
.chart .title { font-size:13px; font-weight:600; fill:var(--ink); }
.chart .tick, .chart .value { fill:#475569; font-size:10.5px; } .chart .legend { fill:#334155; }
.chart .axis { fill:var(--muted); } .chart .cat { fill:var(--ink); font-size:11.5px; }
.chart .grid { stroke:#eef2f7; } .chart .axisline { stroke:#94a3b8; }
.chart .err { stroke:#0f172a; fill:none; }
h2.sub { margin-top:18px; }
footer { color:var(--muted); font-size:12px; margin-top:8px; } dl { margin:0; } dt { font-weight:600; }
dd { margin:0 0 6px; color:var(--muted); }
"""
