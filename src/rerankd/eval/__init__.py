"""`rerankd eval`: retrieval quality of a first stage and of reranking, on BEIR-layout data.

`metrics` (NDCG/MRR/Recall as trec_eval computes them), `beir` (data set and TREC run
readers, meaningful subsets) and `runner` (the command). Kept out of `rerankd`'s top-level
imports: evaluation pulls in DB clients and progress bars a serving process never needs.
"""
