from metaflowlib_bench.suite import main

main()
