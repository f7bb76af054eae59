from fleetlog.cli import main

main()
