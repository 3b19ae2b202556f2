from fusedqk.cli import main

raise SystemExit(main())
