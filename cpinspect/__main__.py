from cpinspect.cli.app import main

main()
