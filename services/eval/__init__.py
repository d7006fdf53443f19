"""`rlhf eval`: the win-rate of a candidate policy over a baseline, judged pairwise."""
