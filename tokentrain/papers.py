"""The papers behind each objective, for the model card TRL writes with every checkpoint (`_paper` of a trainer)."""

from __future__ import annotations

PAPERS = {
    "prior": {
        "title": "PRIOR: Prior-Informed Token Weighting for Next-Token Prediction",
        "id": "2505.08971",
        "citation": "@article{chen2025prior, title = {{PRIOR}}, author = {Chen, Yangyi and Peng, Hao and Zhang, Tong "
        "and Ji, Heng}, year = 2025, journal = {arXiv preprint arXiv:2505.08971}}",
    },
    "rho1": {
        "title": "Rho-1: Not All Tokens Are What You Need",
        "id": "2404.07965",
        "citation": "@inproceedings{lin2024rho1, title = {{Rho-1: Not All Tokens Are What You Need}}, author = {Lin, "
        "Zhenghao and others}, year = 2024, booktitle = {NeurIPS}}",
    },
    "critical_dpo": {
        "title": "Critical Tokens Matter: Token-Level Contrastive Estimation Enhances LLM's Reasoning Capability",
        "id": "2411.19943",
        "citation": "@inproceedings{lin2025critical, title = {{Critical Tokens Matter}}, author = {Lin, Zicheng and "
        "others}, year = 2025, booktitle = {ICML}}",
    },
    "concept_heads": {
        "title": "Improving Large Language Models with Concept-Aware Fine-Tuning",
        "id": "2506.07833",
        "citation": "@article{chen2025caft, title = {{Improving Large Language Models with Concept-Aware "
        "Fine-Tuning}}, author = {Chen, Michael K. and Zhang, Xikun and Huang, Jiaxing and Tao, Dacheng}, year = "
        "2025, journal = {arXiv preprint arXiv:2506.07833}}",
    },
    "aligndistil": {
        "title": "AlignDistil: Token-Level Language Model Alignment as Adaptive Policy Distillation",
        "id": "2503.02832",
        "citation": "@inproceedings{zhang2025aligndistil, title = {{AlignDistil}}, author = {Zhang, Songming and "
        "others}, year = 2025, booktitle = {ACL}}",
    },
    "unlearning": {
        "title": "Who's Harry Potter? Approximate Unlearning in LLMs",
        "id": "2310.02238",
        "citation": "@article{eldan2023harry, title = {{Who's Harry Potter? Approximate Unlearning in LLMs}}, "
        "author = {Eldan, Ronen and Russinovich, Mark}, year = 2023, journal = {arXiv preprint arXiv:2310.02238}}",
    },
}
