"""Real jobs: record what each rank saw (capture), check it in the job (verify), read it back
offline (analyze).
"""
