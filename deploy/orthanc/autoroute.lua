-- Orthanc auto-routing for dicom-seg-node: when an MR series has been stable (no new instance for
-- StableAge seconds), send it to the node. The node's results (SEG, SR) come back into the same study;
-- they are not MR, so they are not routed again.
function OnStableSeries(seriesId, tags, metadata)
  if tags['Modality'] == 'MR' then
    print('dicom-seg-node: routing MR series ' .. seriesId)
    -- the REST route takes any resource level (SendToModality in Lua expects instances)
    RestApiPost('/modalities/segnode/store', seriesId)
  end
end
