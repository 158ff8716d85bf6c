from powergrad.commands.cli import main

raise SystemExit(main())
