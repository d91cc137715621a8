from fatscale.checkpoint.cli import main

main()
