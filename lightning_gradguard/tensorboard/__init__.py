"""Everything TensorBoard: the format (:mod:`.format`, the one owner of every tag, each writer
beside its reader), the sink that writes a run (:mod:`.sink`), the matplotlib images
(:mod:`.render`) and the GradGuard tab (:mod:`.plugin`, ``static/tab.js``).

Only this subpackage imports ``tensorboard``; the guard's core never imports it."""
