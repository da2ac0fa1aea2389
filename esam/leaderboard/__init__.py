"""The leaderboard (issue 21): AlgoPerf's external-tuning ruleset at CPU scale.

Every method declares a search space (conf/search_space/<method>.yaml); on every workload
(conf/workload/) it gets the same number of scrambled-Sobol trials, the trial with the best
*validation* accuracy at the full budget is re-run over fresh seeds, and the board reports
compute-to-target (the target set from the tuned SGD baseline's validation accuracy), test
accuracy at the full budget with intervals, performance profiles and their area as a score.

    python -m esam.leaderboard                 # the CPU suite (conf/leaderboard/cpu.yaml)
    python -m esam.leaderboard --suite cifar   # the GPU/Slurm suite

Order of the modules is the order of the pipeline: space -> plan -> execute -> score -> report.
"""
