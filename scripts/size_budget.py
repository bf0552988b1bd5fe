"""Fail when a service module passes 300 lines or all of them together pass 1,000 (tests, bench, docs excluded).

Raise a budget only in the same commit as the code that needs it, with the reason beside it.
"""

import sys
from pathlib import Path

MODULE_BUDGET = 300
TOTAL_BUDGET = 1000
ROOT = Path(__file__).resolve().parent.parent

counts = {path.name: len(path.read_text().splitlines()) for path in sorted(ROOT.glob("*.py"))}
for name, lines in counts.items():
    print(f"{lines:5d}  {name}{'  <- over ' + str(MODULE_BUDGET) if lines > MODULE_BUDGET else ''}")
total = sum(counts.values())
print(f"{total:5d}  total (budget {TOTAL_BUDGET})")
if total > TOTAL_BUDGET or any(lines > MODULE_BUDGET for lines in counts.values()):
    sys.exit("size budget exceeded")
