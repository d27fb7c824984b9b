from metaflowlib.benchmarks.suite import main

main()
