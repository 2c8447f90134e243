from pretrain.train.cli import main

main()
