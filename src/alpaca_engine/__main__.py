from alpaca_engine.cli import main

main()
