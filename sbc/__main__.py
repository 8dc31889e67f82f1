from sbc.cli import main

raise SystemExit(main())
