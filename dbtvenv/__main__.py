from __future__ import annotations

from dbtvenv.cli import main

raise SystemExit(main())
