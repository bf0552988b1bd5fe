"""Fail when a service module passes its line budget, or all of them together pass theirs (tests, bench, docs excluded).

Raise a budget only in the same commit as the code that needs it, with the reason beside it.
"""

import sys
from pathlib import Path

MODULE_BUDGET = 300
# Raised from 1,000, which was set for the first contract (/, /healthz, /readyz, /chat). The service since
# streams (SSE relay, idle deadline, cancellation), is hardened (client tokens, body and head limits, slow
# clients, overload, graceful shutdown) and serves the groq/openai SDK routes with a strict allowlist:
# 1,650 lines in 9 modules, none over 300. Then 1,665: a refused CORS preflight answers in the envelope
# (a Starlette subclass, 11 lines) instead of plain text. Then 1,700: llm.py and validation.py, both at the
# 300-line limit, were split (Groq's wire format into groq_wire.py, the SDK routes' shapes into sdk_validation.py),
# which costs two module headers. Raise it again only with the change that needs it.
TOTAL_BUDGET = 1700
ROOT = Path(__file__).resolve().parent.parent

counts = {path.name: len(path.read_text().splitlines()) for path in sorted(ROOT.glob("*.py"))}
for name, lines in counts.items():
    print(f"{lines:5d}  {name}{'  <- over ' + str(MODULE_BUDGET) if lines > MODULE_BUDGET else ''}")
total = sum(counts.values())
print(f"{total:5d}  total (budget {TOTAL_BUDGET})")
if total > TOTAL_BUDGET or any(lines > MODULE_BUDGET for lines in counts.values()):
    sys.exit("size budget exceeded")
