"""The one rule for names that become a URL segment and a file or folder name as they are: adapters,
rating campaigns, their systems and criteria."""

from __future__ import annotations

import re

NAME_PATTERN = re.compile(r"^[a-z0-9_-]{1,64}$")  # use fullmatch: with match, "$" accepts "a\n"
NAME_RULE = "1-64 characters of a-z, 0-9, _ and -"
# What the studio's raters judge (`POST /ratings`), names a campaign's criteria share (`slapgen campaign create`
# refuses a near miss of one) so that the two read alike.
CRITERIA = ("motion_accuracy", "impact_realism", "prompt_adherence", "overall")
