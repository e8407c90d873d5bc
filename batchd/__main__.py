from __future__ import annotations

from batchd.cli import main

raise SystemExit(main())
