"""What every stage shares and no stage owns: norm math on gradient lists (:mod:`.norms`) and the
optimizer's layout of parameters into named layers (:mod:`.layout`). Nothing here imports another
subpackage of the library."""
