"""Figures and tables of the papers, for any run (report.md, curves, confusion matrices, t-SNE, Grad-CAM, ...)."""
