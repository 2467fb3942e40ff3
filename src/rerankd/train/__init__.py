"""Fine-tuning and distillation of rerankd cross-encoders (`rerankd train`, `rerankd distill`).

- `data`: BEIR training data, hard-negative mining (BM25, rerankd's encoders, TREC runs),
  training groups, the dev slice of train queries, teacher-score files; refuses
  evaluation-only data.
- `losses`: listwise softmax cross-entropy, margin-MSE, KL and MSE distillation.
- `modeling`: cross-encoders from backbones, students from teachers, Matryoshka per-depth
  heads, and the checkpoint folders `rerankd serve` loads.
- `trainer`: the seeded, logged, resumable, time-bounded training loop.
- `cli`: the command lines.

Nothing here is imported by the serving path.
"""
