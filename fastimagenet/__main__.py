from fastimagenet.cli import main

raise SystemExit(main())
