"""Figures and tables of the papers, for any run (report.md, curves, confusion matrices, t-SNE, Grad-CAM, ...).

Modules: ``plots`` (curves, confusion, per-class, run comparison), ``report`` (report.md of a run), ``analyze``
(``ferkit analyze`` / ``ferkit compare``), ``tsne`` (``plot_tsne_grid``), ``gradcam`` (``gradcam_grid``),
``model_views`` (DSAN / ARM / POSTER / RGB-D views), ``tables`` (headline, robustness, CV, noise tables),
``data_stats`` (``ferkit data stats``), ``profile`` (``ferkit profile``), ``cli`` (sub-commands).
"""
