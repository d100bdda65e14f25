from tests.bench.main import main

main()
