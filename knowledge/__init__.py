"""The knowledge bank: subjects -> courses -> lectures written by experts, and the knowledge
points a model draws from each lecture (the VideoKR paper's first stage).

``knowledge.schemas`` holds the bank's and the text steps' models, ``knowledge.loader`` reads
bank files (YAML or jsonl), ``knowledge.pipeline`` is the ``bank`` pipeline that runs
``knowledge_points`` over every lecture, and ``knowledge.built`` reads what it wrote.
"""
