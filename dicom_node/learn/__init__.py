"""The last stage: what comes back from the viewers after delivery, and what the node learns from it.

A radiologist who fixes a result in OHIF or 3D Slicer saves a new SEG to the archive, which routes it here.
That SEG is the only real label a site will have: it measures the serving model on the site's own patients
(Dice per structure and model version) and, in learning rounds, trains the next model, which serves only if
it beats the current one on corrections it never saw.
"""
