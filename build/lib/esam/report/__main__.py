from esam.report.cli import main

main()
