from sparsetune.cli import main

main()
