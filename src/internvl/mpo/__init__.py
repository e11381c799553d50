"""Mixed preference optimization (MPO, arXiv 2411.10442) and the preference data it trains on; runs through the
one training loop (train/).

    losses.py      DPO sigmoid, BCO pair (running reward shift), NLL; MPOArgs (beta, loss weights)
    objective.py   the reference model (frozen copy, or the base under LoRA), MPOObjective, train_mpo
    data.py        MMPR pair rows -> (chosen, rejected) samples -> padded batches, resumable
    prefs.py       preference pairs sampled from the model itself (+ truncated-continuation negatives)
"""
