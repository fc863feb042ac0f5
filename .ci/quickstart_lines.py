"""Print the command lines of README.md's Quickstart, one per line, as a user
would paste them: the ```bash blocks of the "## Quickstart" section, comments
and blank lines left out. CI runs exactly these (no copy to drift)."""

import re
import sys
from pathlib import Path

text = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md").read_text()
section = re.search(r"^## Quickstart\n(.*?)(?=^## )", text, flags=re.S | re.M)
if section is None:
    sys.exit("README.md has no '## Quickstart' section")
blocks = re.findall(r"```bash\n(.*?)```", section.group(1), flags=re.S)
lines = [line for block in blocks for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
if len(blocks) != 2 or len(lines) != 2:
    sys.exit(f"README.md's Quickstart must be two bash blocks of one line each, found {len(blocks)} blocks, "
             f"{len(lines)} lines")
print("\n".join(lines))
