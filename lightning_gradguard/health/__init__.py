"""A run's gradient health, judged from what it logged: :func:`~.judge.judge_run` turns a
:class:`~.judge.RunData` (however it was read) into a :class:`~.judge.RunHealth`. The CLI and the
tab both call it. It imports neither TensorBoard nor Lightning."""
