from distrack.cli import main

raise SystemExit(main())
