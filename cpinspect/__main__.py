from cpinspect.cli import main

main()
