from xcli.cli import main

main()
