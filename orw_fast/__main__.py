from orw_fast.cli import main

main()
