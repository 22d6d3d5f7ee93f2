from stand.cli import main

main()
