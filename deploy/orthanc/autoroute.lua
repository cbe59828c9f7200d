-- Orthanc auto-routing for dicom-seg-node: when an MR series has been stable (no new instance for
-- StableAge seconds), send it to the node. The node's results (SEG, SR) come back into the same study;
-- SR is not routed again.
--
-- SEG series are routed too: a radiologist's corrected segmentation (saved from OHIF by STOW, or sent from
-- 3D Slicer) is how the node measures and improves its accuracy (docs/corrections.md). The node's own SEGs
-- arrive the same way; it recognises them by SOP Instance UID and ignores them (nothing is sent back, so
-- this makes no loop). Set ROUTE_SEG to false to keep corrections away from the node.
local ROUTE_SEG = true

function OnStableSeries(seriesId, tags, metadata)
  local modality = tags['Modality']
  if modality == 'MR' or (ROUTE_SEG and modality == 'SEG') then
    print('dicom-seg-node: routing ' .. modality .. ' series ' .. seriesId)
    -- the REST route takes any resource level (SendToModality in Lua expects instances)
    RestApiPost('/modalities/segnode/store', seriesId)
  end
end
