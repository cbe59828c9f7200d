"""Generation labels of the randomised anatomy and how they map onto the five training classes.

SynthSeg's point is that the image is drawn from *more* labels than the network segments: cortex and
marrow of each bone, several muscle groups, fat, skin, vessels, septa, joint fluid, bones that are never
segmented (patella, talus) and objects outside the body each get their own random intensity, so the
network cannot rely on any one contrast (bright marrow, dark cortex, grey muscle) that a foreign scanner
may not show. Only ``CLASS_OF`` ties them to what is segmented (values as in ``inference.labels``).
"""

from __future__ import annotations

import numpy as np

BACKGROUND = 0
SKIN = 1
FAT = 2
MUSCLE_A, MUSCLE_B, MUSCLE_C, MUSCLE_D = 3, 4, 5, 6
SEPTUM = 7
VESSEL = 8
VISCERA = 9
FLUID = 10  # joint fluid / cartilage in the hip and knee gaps
OBJ_BRIGHT = 11  # things outside the body: coil housings, markers, table
OBJ_DARK = 12
OTHER_CORTEX, OTHER_MARROW = 13, 14  # patella, talus: bone that must NOT be labelled
FEMUR_CORTEX, FEMUR_MARROW = 15, 16
TIBIA_CORTEX, TIBIA_MARROW = 17, 18
FIBULA_CORTEX, FIBULA_MARROW = 19, 20
PELVIS_CORTEX, PELVIS_MARROW = 21, 22
N_GEN_BASE = 23  # the labels ``labelmap`` draws; a bank of such maps renders with exactly the old random draws
# growth plates (cartilage signal) of each bone, drawn by ``realshape``: segmented as the bone they belong to
FEMUR_PHYSIS, TIBIA_PHYSIS, FIBULA_PHYSIS, PELVIS_PHYSIS = 23, 24, 25, 26
N_GEN = 27

MUSCLES = (MUSCLE_A, MUSCLE_B, MUSCLE_C, MUSCLE_D)
NAMES = ("background", "skin", "fat", "muscle_a", "muscle_b", "muscle_c", "muscle_d", "septum", "vessel",
         "viscera", "fluid", "object_bright", "object_dark", "other_cortex", "other_marrow", "femur_cortex",
         "femur_marrow", "tibia_cortex", "tibia_marrow", "fibula_cortex", "fibula_marrow", "pelvis_cortex",
         "pelvis_marrow", "femur_physis", "tibia_physis", "fibula_physis", "pelvis_physis")

#: generation label -> training class (0 background, 1 femur, 2 tibia, 3 fibula, 4 pelvis)
CLASS_OF = np.zeros(N_GEN, dtype=np.uint8)
CLASS_OF[[FEMUR_CORTEX, FEMUR_MARROW, FEMUR_PHYSIS]] = 1
CLASS_OF[[TIBIA_CORTEX, TIBIA_MARROW, TIBIA_PHYSIS]] = 2
CLASS_OF[[FIBULA_CORTEX, FIBULA_MARROW, FIBULA_PHYSIS]] = 3
CLASS_OF[[PELVIS_CORTEX, PELVIS_MARROW, PELVIS_PHYSIS]] = 4

#: (cortex, marrow) generation labels of each bone kind
BONE = {"femur": (FEMUR_CORTEX, FEMUR_MARROW), "tibia": (TIBIA_CORTEX, TIBIA_MARROW),
        "fibula": (FIBULA_CORTEX, FIBULA_MARROW), "pelvis": (PELVIS_CORTEX, PELVIS_MARROW),
        "other": (OTHER_CORTEX, OTHER_MARROW)}
CORTICES = tuple(v[0] for v in BONE.values())
MARROWS = tuple(v[1] for v in BONE.values())
PHYSIS = {"femur": FEMUR_PHYSIS, "tibia": TIBIA_PHYSIS, "fibula": FIBULA_PHYSIS, "pelvis": PELVIS_PHYSIS}
PHYSES = tuple(PHYSIS.values())
