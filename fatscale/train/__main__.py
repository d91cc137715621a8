from fatscale.train.cli import main

main()
