from __future__ import annotations

from dbtvenv.main import main

raise SystemExit(main())
